"""Tuned schedules: explicit timesteps change only table rows; the file round-trips and is checked."""
import json
import re

import pytest
import torch

from fastdiff.ops import reference
from fastdiff.schedulers import linear_schedule, step_table, tuned
from fastdiff.schedulers.dpmsolver import dpmsolver_table

SCHEDULE = linear_schedule()
HASH = "ab" * 32


@pytest.mark.parametrize("method, order", [("dpmsolver++", 2), ("dpmsolver++", 3), ("unipc", 2), ("unipc", 3)])
def test_explicit_default_timesteps_give_the_default_table(method, order):
    default = step_table(SCHEDULE, method, steps=6, order=order)
    explicit = step_table(SCHEDULE, method, order=order, timesteps=default.timesteps.tolist())
    assert torch.equal(explicit.timesteps, default.timesteps) and torch.equal(explicit.coefs, default.coefs)


def test_explicit_timesteps_move_only_the_rows_that_read_them():
    default = dpmsolver_table(SCHEDULE, steps=6, order=3)
    moved = default.timesteps.clone()
    moved[3] -= 40
    table = dpmsolver_table(SCHEDULE, order=3, timesteps=moved)
    changed = (table.coefs != default.coefs).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2, 3, 4]  # rows i - 1 .. i + 2, but the last one is first order: it reads its own only
    assert dpmsolver_table(SCHEDULE, order=3, timesteps=moved, dtype=torch.float64).coefs.dtype == torch.float64


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_explicit_timesteps_match_diffusers_over_the_same_timesteps(order):
    """diffusers' UniPC takes no timesteps argument: its timesteps and sigmas are set by hand after
    set_timesteps, which is what its step reads."""
    diffusers = pytest.importorskip("diffusers")
    from unipc_cases import SHAPE, fake_model

    timesteps = [978, 874, 600, 401, 200, 57, 20]
    scheduler = diffusers.UniPCMultistepScheduler(solver_order=order)
    scheduler.set_timesteps(len(timesteps))
    abar = scheduler.alphas_cumprod
    scheduler.timesteps = torch.tensor(timesteps)
    scheduler.sigmas = torch.cat([((1 - abar) / abar).sqrt()[timesteps], torch.zeros(1)])
    table = step_table(SCHEDULE, "unipc", order=order, timesteps=timesteps)
    x = expected = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    history = table.new_history(x.shape)
    for i, t in enumerate(timesteps):
        expected = scheduler.step(fake_model(expected, t, abar), t, expected).prev_sample
        x, _ = reference.sampler_step(x, fake_model(x, t, abar), torch.tensor(i), table.coefs, history=history)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=2e-5)


def test_ddim_explicit_timesteps_step_to_the_next_one():
    table = step_table(SCHEDULE, "ddim", timesteps=[900, 400, 100])
    abar = SCHEDULE.alphas_cumprod
    assert table.timesteps.tolist() == [900, 400, 100]
    expected = torch.stack([abar[400], abar[100], torch.tensor(1.0).double()]).sqrt()
    assert torch.allclose(table.coefs[:, 2].double(), expected)


@pytest.mark.parametrize("bad, match", [([5, 5, 1], "strictly descending"), ([1000, 3], r"\[0, 999\]"),
                                        ([3.0, 1.0], "integers"), ([], "non-empty")])
def test_bad_timesteps_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        step_table(SCHEDULE, "dpmsolver++", timesteps=bad)


def test_file_round_trips_and_refuses_damage_and_other_weights(tmp_path):
    schedule = tuned.TunedSchedule("dpm++3m", (999, 600, 250, 40), 1000, HASH, {"calibration": {"before": 0.2}},
                                   {"search": "pattern"})
    path = tuned.save_tuned(tmp_path / tuned.file_name("dpm++3m", 4), schedule)
    assert path.name == "dpm++3m-4.json" and tuned.load_tuned(path, HASH, 1000) == schedule
    with pytest.raises(ValueError, match="tuned for other weights"):
        tuned.load_tuned(path, "cd" * 32, 1000)
    with pytest.raises(ValueError, match="1000 timesteps, the model has 500"):
        tuned.load_tuned(path, HASH, 500)
    data = json.loads(path.read_text())
    for damage, match in [(lambda d: d.pop("timesteps"), "missing timesteps"),
                          (lambda d: d.update(timesteps=[3, 600, 1]), "strictly descending"),
                          (lambda d: d.update(format="other"), "not a tuned schedule")]:
        broken = json.loads(json.dumps(data))
        damage(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            tuned.load_tuned(path, HASH, 1000)
    path.write_text("{ not json")
    with pytest.raises(ValueError, match=re.escape(f"{path.name}: not a tuned schedule")):
        tuned.load_tuned(path, HASH, 1000)
