"""Eps models whose probability-flow ODE is known or cheap: for the ODE-error and tuning tests."""
from __future__ import annotations

import torch

from fastdiff.schedulers import NoiseSchedule

#: Variance of the toy data distribution N(0, DATA_VARIANCE I).
DATA_VARIANCE = 0.25


class GaussianEps(torch.nn.Module):
    """The exact eps prediction for data N(0, DATA_VARIANCE I), plus ``scale`` times a tiny random
    convolution net, smooth in t (0: the ODE has a closed form, :func:`gaussian_ode_solution`)."""

    def __init__(self, schedule: NoiseSchedule, scale: float = 0.0, seed: int = 0):
        super().__init__()
        self.register_buffer("abar", schedule.alphas_cumprod.float())
        self.scale = scale
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.Tanh(),
                                           torch.nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x, t):
        abar = self.abar[t.long()].view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * x / (abar * DATA_VARIANCE + 1 - abar)
        if not self.scale:
            return eps
        return eps + self.scale * self.net(torch.cat([x, abar.sqrt().expand_as(x)], dim=1))


def gaussian_ode_solution(schedule: NoiseSchedule, x_T: torch.Tensor) -> torch.Tensor:
    """GaussianEps(scale=0)'s ODE from x_T at t = T - 1 to t = 0 (x_t / std_t is constant), then
    its data prediction there, as the ODE reference ends."""
    abar = schedule.alphas_cumprod
    variance = abar * DATA_VARIANCE + 1 - abar
    x_0 = x_T.double() * (variance[0] / variance[-1]).sqrt()
    return x_0 * abar[0].sqrt() * DATA_VARIANCE / variance[0]
