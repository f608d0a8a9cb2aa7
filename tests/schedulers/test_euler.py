"""Euler / Euler Ancestral tables: the NoiseSchedule table equals the one built from diffusers'
schedulers (whose runs the integration and sampler tests compare), rows in both coordinates."""
from __future__ import annotations

import pytest
import torch

from fastdiff.integrations.diffusers.schedulers import table_from_scheduler
from fastdiff.schedulers import linear_schedule, step_table
from fastdiff.schedulers.euler import euler_rows, euler_table

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("method, name", [("euler", "EulerDiscreteScheduler"),
                                          ("euler-ancestral", "EulerAncestralDiscreteScheduler")])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_table_equals_the_diffusers_schedulers(method, name, spacing):
    ours = euler_table(linear_schedule(), steps=12, method=method, spacing=spacing)
    theirs = table_from_scheduler(getattr(diffusers, name)(timestep_spacing=spacing), steps=12)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.method == theirs.method
    # diffusers' sigmas come from float32 alphas_cumprod: 1 - abar cancels near t = 0 (8e-5 relative at t = 0)
    torch.testing.assert_close(ours.coefs, theirs.coefs, rtol=1e-4, atol=0)


def test_vp_rows_are_the_scaled_rows_rescaled():
    """x = x_s / sqrt(1 + sigma^2): one step of each form from the same point agrees."""
    sigmas = torch.tensor([14.6, 3.2, 0.7, 0.0], dtype=torch.float64)
    for ancestral in (False, True):
        scaled, vp = euler_rows(sigmas, ancestral, "v_prediction", True), euler_rows(sigmas, ancestral,
                                                                                     "v_prediction", False)
        x_s, out, z = 2.0, 0.3, -0.8
        for i in range(3):
            k, k_next = (1 + sigmas[i] ** 2).sqrt(), (1 + sigmas[i + 1] ** 2).sqrt()
            s_next = scaled[i, 3] * x_s + scaled[i, 4] * out + scaled[i, 5] * z
            v_next = vp[i, 3] * (x_s / k) + vp[i, 4] * out + vp[i, 5] * z
            assert torch.isclose(v_next, s_next / k_next, rtol=1e-12)
            assert torch.isclose(vp[i, 0] * (x_s / k) - vp[i, 1] * out, scaled[i, 0] * x_s - scaled[i, 1] * out)


def test_step_table_names_and_default_steps():
    assert step_table(linear_schedule(), "euler").num_steps == 30
    assert step_table(linear_schedule(), "euler-ancestral", steps=5, start=2).num_steps == 3
    assert (step_table(linear_schedule(), "euler-ancestral", steps=5).coefs[:-1, 5] > 0).all()
