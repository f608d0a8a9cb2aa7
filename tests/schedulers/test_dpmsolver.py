"""DPM-Solver++ tables against diffusers' DPMSolverMultistepScheduler, whole trajectories."""
from __future__ import annotations

import pytest
import torch

from fastdiff.integrations.diffusers.schedulers import dpmsolver_table_from_scheduler
from fastdiff.sampling import draw_noise, sample_reference
from fastdiff.schedulers import linear_schedule
from fastdiff.schedulers.dpmsolver import dpmsolver_sigmas, dpmsolver_table

SHAPE = (2, 3, 4, 4)


def fake_model(x, t):
    """A smooth, t-dependent, nonlinear stand-in for a UNet (any prediction type)."""
    scale = (t.double() / 1000.0).to(x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(0.7 * x + scale) - 0.3 * scale * x


def diffusers_scheduler(**config):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, **config)


def diffusers_trajectory(scheduler, steps, noise):
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)  # Karras timesteps can repeat; count steps, do not look them up
    x = noise.x_T.clone()
    sde = scheduler.config.algorithm_type.startswith("sde")
    for i, t in enumerate(scheduler.timesteps):
        out = fake_model(x, t.expand(x.shape[0]))
        x = scheduler.step(out, t, x, variance_noise=noise.z[i] if sde else None).prev_sample
    return scheduler.timesteps, x


CONFIGS = [
    pytest.param(dict(solver_order=1), 10, id="order1"),
    pytest.param(dict(solver_order=2), 20, id="2m-linspace"),
    pytest.param(dict(solver_order=3), 20, id="3m-linspace"),
    pytest.param(dict(solver_order=2, timestep_spacing="leading", steps_offset=1), 15, id="2m-leading-offset"),
    pytest.param(dict(solver_order=3, timestep_spacing="trailing"), 12, id="3m-trailing"),
    pytest.param(dict(solver_order=2, solver_type="heun", lower_order_final=False), 8, id="2m-heun"),
    pytest.param(dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False), 25, id="3m-sigma-min"),
    pytest.param(dict(solver_order=2, use_karras_sigmas=True), 10, id="2m-karras"),
    pytest.param(dict(solver_order=2, prediction_type="v_prediction"), 10, id="2m-v"),
    pytest.param(dict(solver_order=3, prediction_type="sample", timestep_spacing="trailing"), 10, id="3m-x0"),
    pytest.param(dict(solver_order=2, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 20, id="2m-cosine"),
    pytest.param(dict(solver_order=3, beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True), 10,
                 id="3m-cosine-karras"),
    pytest.param(dict(solver_order=1, algorithm_type="sde-dpmsolver++"), 10, id="sde-order1"),
    pytest.param(dict(solver_order=2, algorithm_type="sde-dpmsolver++"), 20, id="sde-2m"),
    pytest.param(dict(solver_order=2, algorithm_type="sde-dpmsolver++", solver_type="heun",
                      timestep_spacing="leading"), 10, id="sde-2m-heun-leading"),
    pytest.param(dict(solver_order=3, algorithm_type="sde-dpmsolver++", timestep_spacing="trailing"), 16,
                 id="sde-3m-trailing"),
]


@pytest.mark.parametrize("config, steps", CONFIGS)
def test_trajectory_matches_diffusers(config, steps):
    scheduler = diffusers_scheduler(**config)
    table = dpmsolver_table_from_scheduler(scheduler, steps)
    noise = draw_noise(table, SHAPE, seed=3)
    timesteps, expected = diffusers_trajectory(scheduler, steps, noise)
    assert torch.equal(table.timesteps, timesteps)
    actual = sample_reference(fake_model, table, noise=noise)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-5)


def test_table_shape_and_history_columns():
    schedule = linear_schedule()
    for order in (1, 2, 3):
        table = dpmsolver_table(schedule, steps=10, order=order)
        assert table.coefs.shape == (10, 6 + order - 1) and table.history_size == order - 1
        assert table.coefs[:, 5].abs().max() == 0  # the ODE form adds no noise
    sde = dpmsolver_table(schedule, steps=10, order=2, algorithm="sde-dpmsolver++")
    assert (sde.coefs[:-1, 5] > 0).all() and sde.coefs[-1, 5] == 0  # final sigma 0: no noise


def test_first_order_final_step_returns_the_data_prediction():
    table = dpmsolver_table(linear_schedule(), steps=10, order=3)
    assert torch.equal(table.coefs[-1, 2:], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))


def test_karras_sigmas_span_the_schedule():
    schedule = linear_schedule()
    _, sigmas = dpmsolver_sigmas(schedule, 10, karras=True)
    all_sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()
    torch.testing.assert_close(sigmas[[0, -2]], all_sigmas[[-1, 0]], rtol=1e-4, atol=0)  # 1 - abar in float32, as diffusers
    assert sigmas[-1] == 0 and (sigmas.diff() < 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(algorithm="dpmsolver"), "algorithm"),
        (dict(order=0), "order"),
        (dict(order=4), "order"),
        (dict(order=2.0), "order"),
        (dict(steps=0), "steps"),
        (dict(steps=1001), "steps"),
        (dict(solver_type="bh2"), "solver_type"),
        (dict(prediction="flow_prediction"), "prediction"),
        (dict(spacing="karras"), "spacing"),
        (dict(final_sigmas="one"), "final_sigmas"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpmsolver_table(linear_schedule(), **{"steps": 10, **kwargs})


@pytest.mark.parametrize("config, steps, start", [
    pytest.param(dict(solver_order=2), 10, 4, id="2m-10-from-4"),
    pytest.param(dict(solver_order=3), 20, 8, id="3m-20-from-8"),
    pytest.param(dict(solver_order=2, use_karras_sigmas=True), 25, 10, id="2m-karras-25-from-10"),
    pytest.param(dict(solver_order=2, algorithm_type="sde-dpmsolver++"), 10, 3, id="sde-2m-10-from-3"),
    pytest.param(dict(solver_order=3), 2, 0, id="3m-2-steps"),
])
def test_partial_trajectory_matches_diffusers(config, steps, start):
    """set_begin_index(start): diffusers restarts lower_order_nums, so the first step is first order."""
    scheduler = diffusers_scheduler(**config)
    table = dpmsolver_table_from_scheduler(scheduler, steps, start)
    noise = draw_noise(table, SHAPE, seed=3)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(start)
    x = noise.x_T.clone()
    for i, t in enumerate(scheduler.timesteps[start:]):
        x = scheduler.step(fake_model(x, t.expand(x.shape[0])), t, x, variance_noise=noise.z[i]).prev_sample
    assert torch.equal(table.timesteps, scheduler.timesteps[start:])
    torch.testing.assert_close(sample_reference(fake_model, table, noise=noise), x, rtol=1e-5, atol=2e-5)


def test_start_is_checked():
    with pytest.raises(ValueError, match="start must be an integer in \\[0, 9\\]"):
        dpmsolver_table(linear_schedule(), steps=10, start=10)
