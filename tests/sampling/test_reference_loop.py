"""The reference sampler: determinism, external noise mode, argument checks."""
from __future__ import annotations

import pytest
import torch

from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.sampling import ExternalNoise, draw_noise, sample_reference
from fastdiff.schedulers import ddim_table, ddpm_table, linear_schedule

SHAPE = (2, 3, 8, 8)
STEPS = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny(image_size=8)).eval()


@pytest.fixture(scope="module", params=["ddpm", "ddim-eta0.5"])
def table(request):
    schedule = linear_schedule()
    if request.param == "ddpm":
        return ddpm_table(schedule, steps=STEPS)
    return ddim_table(schedule, steps=STEPS, eta=0.5)


def test_same_seed_gives_bit_identical_samples(model, table):
    first = sample_reference(model, table, shape=SHAPE, seed=7)
    second = sample_reference(model, table, shape=SHAPE, seed=7)
    assert first.shape == SHAPE and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_different_seed_gives_different_samples(model, table):
    first = sample_reference(model, table, shape=SHAPE, seed=7)
    other = sample_reference(model, table, shape=SHAPE, seed=8)
    assert (first - other).abs().max() > 1e-3


def test_external_noise_equals_seed_mode(model, table):
    from_seed = sample_reference(model, table, shape=SHAPE, seed=11)
    noise = draw_noise(table, SHAPE, seed=11)
    assert noise.x_T.shape == SHAPE and noise.z.shape == (STEPS, *SHAPE)
    assert torch.equal(sample_reference(model, table, noise=noise), from_seed)


def test_draw_noise_is_deterministic_and_independent_of_global_rng():
    table = ddim_table(linear_schedule(), steps=STEPS)
    torch.manual_seed(0)
    first = draw_noise(table, SHAPE, seed=5)
    torch.manual_seed(1)
    second = draw_noise(table, SHAPE, seed=5)
    assert torch.equal(first.x_T, second.x_T) and torch.equal(first.z, second.z)
    assert not torch.equal(first.z[0], first.z[1])
    assert draw_noise(table, SHAPE, seed=5, dtype=torch.float64).z.dtype == torch.float64


def test_trajectory_starts_at_x_T_and_ends_at_the_sample(model, table):
    noise = draw_noise(table, SHAPE, seed=2)
    sample, trajectory = sample_reference(model, table, noise=noise, return_trajectory=True)
    assert trajectory.shape == (STEPS + 1, *SHAPE)
    assert torch.equal(trajectory[0], noise.x_T) and torch.equal(trajectory[-1], sample)


def test_training_mode_module_is_sampled_in_eval_mode_and_restored():
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                            num_groups=4, dropout=0.5)).train()
    table = ddim_table(linear_schedule(), steps=2)
    first = sample_reference(model, table, shape=SHAPE, seed=0)
    second = sample_reference(model, table, shape=SHAPE, seed=0)
    assert torch.equal(first, second), "dropout must be off while sampling"
    assert model.training


def test_class_labels_reach_the_model():
    seen = []

    def eps_model(x, t, class_labels=None):
        seen.append(class_labels)
        return torch.zeros_like(x)

    table = ddim_table(linear_schedule(), steps=2)
    labels = torch.tensor([3, 1])
    sample_reference(eps_model, table, shape=SHAPE, seed=0, class_labels=labels)
    assert len(seen) == 2 and all(torch.equal(s, labels) for s in seen)


def test_model_sees_the_table_timesteps():
    seen = []

    def eps_model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    table = ddpm_table(linear_schedule(), steps=4)
    sample_reference(eps_model, table, shape=SHAPE, seed=0)
    assert [s.tolist() for s in seen] == [[t, t] for t in (750, 500, 250, 0)]
    assert all(s.dtype == torch.int64 for s in seen)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(shape=(0, 3, 8, 8), seed=0), ValueError, "batch size"),
        (dict(shape=(2, 3, 8), seed=0), ValueError, "shape"),
        (dict(shape=(2, 3, 0, 8), seed=0), ValueError, "height"),
        (dict(shape=SHAPE), ValueError, "exactly one of seed"),
        (dict(seed=0), ValueError, "shape is required"),
        (dict(shape=SHAPE, seed=0.5), TypeError, "seed"),
        (dict(shape=SHAPE, seed=0, class_labels=torch.tensor([1.0, 2.0])), TypeError, "class_labels"),
        (dict(shape=SHAPE, seed=0, class_labels=torch.tensor([1])), ValueError, "class_labels"),
    ],
    ids=["batch 0", "3-d shape", "zero height", "no seed or noise", "seed without shape", "float seed",
         "float labels", "labels batch"],
)
def test_bad_arguments(kwargs, error, match):
    table = ddim_table(linear_schedule(), steps=STEPS)
    with pytest.raises(error, match=match):
        sample_reference(lambda x, t, *_: x, table, **kwargs)


def test_bad_external_noise():
    table = ddim_table(linear_schedule(), steps=STEPS)
    good = draw_noise(table, SHAPE, seed=0)
    with pytest.raises(ValueError, match="noise.z"):
        ExternalNoise(good.x_T, good.z[:, :1])
    with pytest.raises(ValueError, match="steps"):
        sample_reference(lambda x, t: x, ddim_table(linear_schedule(), steps=STEPS + 1), noise=good)
    with pytest.raises(ValueError, match="exactly one"):
        sample_reference(lambda x, t: x, table, noise=good, seed=0)
    with pytest.raises(ValueError, match="does not match"):
        sample_reference(lambda x, t: x, table, noise=good, shape=(1, 3, 8, 8))


def test_model_returning_wrong_shape_is_reported():
    table = ddim_table(linear_schedule(), steps=STEPS)
    with pytest.raises(ValueError, match="eps shaped like x"):
        sample_reference(lambda x, t: x[:, :1], table, shape=SHAPE, seed=0)


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (3, 1, 5, 7), (1, 1, 3, 3), (2, 1, 4, 2), (1, 1, 1, 17), (4, 1, 3, 5)])
def test_noise_drawn_per_step_equals_the_whole_draw(steps, shape):
    """draw_noise hands out z one step at a time (no S x batch allocation up front), with the
    values the whole (S, *shape) draw after x_T had -- sizes that are not multiples of 16 too."""
    from fastdiff.schedulers import step_table

    table = step_table(linear_schedule(), "ddim", steps=steps)
    generator = torch.Generator().manual_seed(11)
    x_T = torch.randn(shape, generator=generator)
    z = torch.randn((steps, *shape), generator=generator)
    noise = draw_noise(table, shape, 11)
    assert torch.equal(noise.x_T, x_T)
    assert all(torch.equal(noise.step_noise(i), z[i]) for i in range(steps))
    assert torch.equal(noise.step_noise(0), z[0])  # out of order: drawn again from the start
    assert len(noise.per_step) == steps and torch.equal(noise.per_step[steps - 1], z[-1])
    assert noise._z is None  # nothing held beyond the step
    assert torch.equal(noise.z, z) and noise.num_steps == steps
