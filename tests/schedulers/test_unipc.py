"""UniPC tables and the fused UniPCMultistepScheduler step against diffusers' own step, over whole
runs and runs that start part-way (the cases and the table they print: unipc_cases.py)."""
from __future__ import annotations

import pytest
import torch
from unipc_cases import CASES, compare

from fastdiff.ops import reference
from fastdiff.schedulers import linear_schedule, step_table
from fastdiff.schedulers.unipc import unipc_table

pytest.importorskip("diffusers")


@pytest.mark.parametrize("config, steps, begin", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_fused_step_matches_diffusers(config, steps, begin):
    for loop in ("set_begin_index", "slice") if begin else ("set_begin_index",):
        c = compare(config, steps, begin, loop)
        assert c.fused_calls == steps - begin  # every step fused, none left to diffusers
        try:
            torch.testing.assert_close(c.fused, c.diffusers, rtol=1e-5, atol=2e-5)
        except AssertionError:  # large values: as close to a float64 run as diffusers' own float32 step
            fused_error, diffusers_error = c.errors()
            assert fused_error <= 2 * diffusers_error, (loop, fused_error, diffusers_error)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_table_layout(order):
    table = unipc_table(linear_schedule(), steps=8, order=order)
    slots = order + 1  # the data predictions and the corrected sample
    assert table.corrector and table.history_size == slots and table.coefs.shape == (8, 8 + 2 * slots)
    u = table.coefs[:, 6 + slots:]
    assert u[0].tolist() == [1.0] + [0.0] * (1 + slots)  # no correction at a run's first step: y = x_t
    assert (u[1:, 0] == 0).all() and (u[1:, -1] != 0).all()  # later steps correct from the last sample
    # the last step is first order to sigma 0: x_prev = x0, whatever the corrector did
    assert table.coefs[-1, 2:6].tolist() == [1.0, 0.0, 0.0, 0.0] and (table.coefs[-1, 6:6 + slots] == 0).all()


def test_a_run_from_step_k_restarts_the_orders_and_the_corrector():
    whole = unipc_table(linear_schedule(), steps=10, order=3)
    part = unipc_table(linear_schedule(), steps=10, order=3, begin=4)
    assert torch.equal(part.timesteps, whole.timesteps[4:])
    assert part.coefs[0, 10] == 1 and whole.coefs[4, 10] == 0  # u[0]: step 4 corrects in a whole run only
    torch.testing.assert_close(part.coefs[3:], whole.coefs[7:], rtol=0, atol=0)  # third order again from step 3 on


def test_table_through_the_reference_step_matches_diffusers():
    """step_table(method="unipc") over the reference loop, the Sampler's path."""
    from diffusers import UniPCMultistepScheduler
    from unipc_cases import SHAPE, fake_model, trajectory

    scheduler = UniPCMultistepScheduler(solver_order=3)
    table = step_table(linear_schedule(), "unipc", steps=12, order=3)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    expected = trajectory(scheduler, 12, 0, x)
    history = table.new_history(x.shape)
    for i, t in enumerate(table.timesteps):
        x, _ = reference.sampler_step(x, fake_model(x, t, scheduler.alphas_cumprod), torch.tensor(i), table.coefs,
                                      history=history)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(order=0), "order"),
        (dict(order=4), "order"),
        (dict(solver_type="midpoint"), "solver_type"),
        (dict(prediction="flow_prediction"), "prediction"),
        (dict(spacing="karras"), "spacing"),
        (dict(final_sigmas="one"), "final_sigmas"),
        (dict(steps=0), "steps"),
        (dict(begin=10), "begin"),
        (dict(solver_type="bh1"), "solver_type 'bh1' with final_sigmas 'zero'"),
        (dict(order=2, lower_order_final=False), "order 2 without lower_order_final"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        unipc_table(linear_schedule(), **{"steps": 10, **kwargs})


@pytest.mark.parametrize("config", [dict(solver_type="bh1"), dict(solver_order=2, lower_order_final=False)],
                         ids=["bh1", "no-lower-order-final"])
def test_the_refused_final_steps_are_not_finite_in_diffusers(config):
    """What the refusals above say: diffusers' own last step is not finite there."""
    from diffusers import UniPCMultistepScheduler
    from unipc_cases import SHAPE, trajectory

    x = trajectory(UniPCMultistepScheduler(**config), 6, 0, torch.randn(SHAPE, generator=torch.Generator()))
    assert not x.isfinite().all()
