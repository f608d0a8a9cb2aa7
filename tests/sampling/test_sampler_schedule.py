"""Which update fastdiff.Sampler runs: a diffusers scheduler's own (settings and all), the model
folder's schedule by default, and a clear refusal or warning where it cannot know or reproduce it."""
import pytest
import torch
from helpers import assert_within_2x_of_torch, tiny_diffusers_unet

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from fastdiff.commands.verify import fp64_trajectory
from fastdiff.models.folders import load_model, save_model
from fastdiff.models.unet import UNet, UNetConfig
from fastdiff.sampling import ExternalNoise, draw_noise, sample_reference
from fastdiff.sampling.sampler import Sampler
from fastdiff.sampling.step import DiffusersEps
from fastdiff.schedulers import cosine_schedule, ddpm_table, step_table

STEPS = 8


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_diffusers_unet().eval()


def diffusers_loop(unet, scheduler, noise, eta):
    """What a diffusers DDIM pipeline computes, with the given noise as variance_noise."""
    scheduler.set_timesteps(STEPS)
    x = noise.x_T.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise.z[i]).prev_sample
    return x


@pytest.mark.parametrize(
    "config, eta",
    [
        (dict(clip_sample=True, timestep_spacing="trailing", set_alpha_to_one=False), 0.0),
        (dict(clip_sample=True, clip_sample_range=0.5, timestep_spacing="linspace"), 0.5),
        (dict(clip_sample=False, steps_offset=1), 0.0),
    ],
    ids=["trailing-clip", "linspace-range-eta", "offset"],
)
def test_sampler_samples_as_the_diffusers_scheduler_does(unet, config, eta):
    scheduler = DDIMScheduler(**config)
    sampler = Sampler(unet, schedule=scheduler, steps=STEPS, eta=eta, compile=False)
    scheduler.set_timesteps(STEPS)
    assert sampler.table.method == "ddim" and torch.equal(sampler.table.timesteps, scheduler.timesteps)
    noise = draw_noise(sampler.table, (2, 3, 8, 8), seed=0)
    theirs = diffusers_loop(unet, DDIMScheduler(**config), noise, eta)
    truth = fp64_trajectory(DiffusersEps(unet), sampler.table, noise)
    assert_within_2x_of_torch(sampler.sample(noise=noise), theirs, truth, "sampler vs the diffusers scheduler")


def test_ddpm_scheduler_sets_method_steps_and_variance(unet):
    scheduler = DDPMScheduler(variance_type="fixed_small", clip_sample=True, timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    sampler = Sampler(unet, schedule=scheduler, compile=False)  # steps: the scheduler's num_inference_steps
    assert sampler.table.method == "ddpm" and torch.equal(sampler.table.timesteps, scheduler.timesteps)
    assert sampler.table.clip == 1.0
    with pytest.raises(ValueError, match="method 'ddim' does not match the DDPMScheduler"):
        Sampler(unet, schedule=scheduler, method="ddim", compile=False)


@pytest.mark.parametrize(
    "scheduler, reason",
    [
        (DDPMScheduler(prediction_type="v_prediction"), "prediction_type 'v_prediction'"),
        (DDIMScheduler(thresholding=True), "dynamic thresholding"),
        (DDPMScheduler(variance_type="learned_range"), "variance_type 'learned_range'"),
    ],
)
def test_settings_no_table_reproduces_are_refused(unet, scheduler, reason):
    with pytest.raises(ValueError, match=f"cannot reproduce this scheduler's step: {reason}"):
        Sampler(unet, schedule=scheduler, compile=False)


def test_diffusers_unet_without_a_scheduler_warns(unet):
    with pytest.warns(RuntimeWarning, match="no schedule given for a diffusers UNet.*pass schedule="):
        sampler = Sampler(unet, method="ddim", steps=4, compile=False)
    assert any("no schedule given" in note for note in sampler.describe()["notes"])


def test_model_folder_schedule_is_the_default(tmp_path):
    torch.manual_seed(0)
    save_model(UNet(UNetConfig.tiny(image_size=8)), tmp_path / "cosine", schedule="cosine", num_timesteps=200)
    model, info = load_model(tmp_path / "cosine")
    table = step_table(info.noise_schedule(), "ddim", steps=5)
    sampler = Sampler(model, method="ddim", steps=5, compile=False)
    assert torch.equal(sampler.table.coefs, table.coefs) and torch.equal(sampler.table.timesteps, table.timesteps)
    assert torch.equal(table.coefs, step_table(cosine_schedule(200), "ddim", steps=5).coefs)
    noise = draw_noise(table, (1, 3, 8, 8), seed=0)
    assert torch.equal(sampler.sample(noise=noise), sample_reference(model, table, noise=noise))
    assert Sampler(model, compile=False).table.num_steps == 200  # DDPM over the folder's T
    assert torch.equal(Sampler(model, compile=False).table.coefs, ddpm_table(cosine_schedule(200)).coefs)


def diffusers_partial_loop(unet, scheduler, steps, start, x, noise_at, generator=None):
    """img2img's loop from step ``start``: set_begin_index, scale_model_input, step (DPM-Solver++
    with ``noise_at(i)`` as variance_noise; Euler with ``generator``)."""
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(start)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[start:]):
            out = unet(scheduler.scale_model_input(x, t), t).sample
            if hasattr(scheduler.config, "solver_order"):
                x = scheduler.step(out, t, x, variance_noise=noise_at(i)).prev_sample
            else:
                x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("algorithm, order, start", [("dpmsolver++", 3, 4), ("sde-dpmsolver++", 2, 3),
                                                      ("dpmsolver++", 2, 0)])
def test_sampler_runs_a_dpmsolver_scheduler_from_step_k(unet, algorithm, order, start):
    """Sampler(schedule=DPMSolverMultistepScheduler) (a TypeError before), and start=k as
    set_begin_index(k): orders counted from the run's first step, history empty there."""
    config = dict(solver_order=order, algorithm_type=algorithm)
    sampler = Sampler(unet, schedule=DPMSolverMultistepScheduler(**config), steps=STEPS, start=start, compile=False)
    assert sampler.table.num_steps == STEPS - start
    noise = draw_noise(sampler.table, (2, 3, 8, 8), seed=0)
    theirs = diffusers_partial_loop(unet, DPMSolverMultistepScheduler(**config), STEPS, start, noise.x_T.clone(),
                                    lambda i: noise.z[i])
    truth = fp64_trajectory(DiffusersEps(unet), sampler.table, noise)
    assert_within_2x_of_torch(sampler.sample(noise=noise), theirs, truth, "sampler vs DPMSolverMultistepScheduler")


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("start", [0, 3])
def test_sampler_euler_in_vp_coordinates_is_diffusers_euler(unet, name, start):
    """The Sampler's Euler rows act on x = x_s / sqrt(1 + sigma^2) (no model-input scaling); from
    the same start, diffusers' x_s / sqrt(1 + sigma_start^2) is the Sampler's x. Euler Ancestral's
    z is what diffusers' step draws from the generator, one draw per step."""
    scheduler = getattr(diffusers, name)(timestep_spacing="trailing")
    sampler = Sampler(unet, schedule=scheduler, steps=STEPS, start=start, compile=False)
    scheduler.set_timesteps(STEPS)
    assert torch.equal(sampler.table.timesteps, scheduler.timesteps[start:].long())
    shape = (2, 3, 8, 8)
    generator = torch.Generator().manual_seed(1)
    z = torch.stack([torch.randn(shape, generator=generator) for _ in range(STEPS - start)])
    noise = ExternalNoise(torch.randn(shape, generator=torch.Generator().manual_seed(0)), z)
    scale = (scheduler.sigmas[start] ** 2 + 1) ** 0.5
    theirs = diffusers_partial_loop(unet, scheduler, STEPS, start, noise.x_T * scale, None,
                                    torch.Generator().manual_seed(1))
    truth = fp64_trajectory(DiffusersEps(unet), sampler.table, noise)
    assert_within_2x_of_torch(sampler.sample(noise=noise), theirs, truth, f"sampler vs {name}")


def test_euler_scheduler_with_fractional_timesteps_is_refused(unet):
    with pytest.raises(ValueError, match="timesteps are fractional.*'linspace'"):
        Sampler(unet, schedule=diffusers.EulerDiscreteScheduler(), steps=STEPS, compile=False)


def test_settings_a_scheduler_brings_are_not_overridden(unet):
    with pytest.raises(ValueError, match="order: a DDIMScheduler passed as schedule brings its own"):
        Sampler(unet, schedule=DDIMScheduler(), order=2, compile=False)
    with pytest.raises(ValueError, match="eta applies to a DDIMScheduler only"):
        Sampler(unet, schedule=DPMSolverMultistepScheduler(), eta=0.5, compile=False)


def test_note_names_the_spacing_the_table_uses(unet):
    with pytest.warns(RuntimeWarning, match="linspace spacing"):
        Sampler(unet, method="dpmsolver++", steps=4, compile=False)
